# usage: killtest.py OUT CKPT MIN_FILES [extra job args...]
import subprocess, sys, time, os, signal, glob
PY = "/work/main/.venv/bin/python"
out, ck, minf = sys.argv[1], sys.argv[2], int(sys.argv[3]); extra = sys.argv[4:]
log = open(out.rstrip("/") + ".run1.log", "w")
p = subprocess.Popen([PY, "/tmp/ckpt_eval/job.py", "--out", out, "--ckpt", ck, "--keep"] + extra,
                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
t0 = time.time()
while time.time() - t0 < 300:
    n = len(glob.glob(f"{out}/*.parquet"))
    pend = glob.glob(f"{ck}/*.pending.parquet")
    if (minf >= 0 and n >= minf) or (minf < 0 and n >= -minf and pend): break
    if p.poll() is not None: print("job finished before kill!"); break
    time.sleep(0.05)
(os.killpg(p.pid, signal.SIGKILL) if os.environ.get("KILLPG") else os.kill(p.pid, signal.SIGKILL)); p.wait()
def snap(tag):
    fs = sorted(os.listdir(out)) if os.path.isdir(out) else []
    cf = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
    print(f"[{tag}] out files={len(fs)} ckpt committed={len([c for c in cf if '.pending' not in c])} pending={len([c for c in cf if '.pending' in c])}", flush=True)
snap("at kill")
time.sleep(10); snap("kill+10s")
# leftover processes of that session (started by us): list and kill by pid
pids = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
print("leftover procs in killed session:", [open(f"/proc/{q}/cmdline").read().split("\0")[0][-40:] for q in pids if os.path.exists(f"/proc/{q}")], flush=True)
for q in pids:
    try: os.kill(int(q), signal.SIGKILL)
    except ProcessLookupError: pass
time.sleep(2); snap("after cleanup")
