"""JPEG decode, EXIF orientation and resize on the model's device (``--device-preprocess``).

The decode stage (`pipeline.inputs.decode.check_for_device`) checks each JPEG's header on a CPU worker (format,
pixel cap, aspect ratio, EXIF orientation) and passes its bytes on; the model actor then decodes the
batch in one `torchvision.io.decode_jpeg` call on its device (nvJPEG on CUDA), applies the orientation
and resizes there (`model.predictor.prepare_tensor`). CPU workers do no pixel work for these images and
the object store carries compressed bytes instead of decoded pixels.

When the batched call fails (one bad stream fails it), each image is retried on its own; an image the
device decoder refuses is decoded with Pillow as the CPU path does, and one Pillow refuses too becomes an
error row. Differences from the CPU path: nvJPEG's IDCT and chroma upsampling and the float resize kernel
each move some pixels by a grey level or so (see `model.tensor_preprocess.resize_tensor`).
"""

from __future__ import annotations

import logging
import warnings

import torch

from model.predictor import InferenceConfig, PreparedImage, prepare_tensor
from pipeline.inputs.decode import decode_image

log = logging.getLogger(__name__)

# The decode stage already applied the job's pixel cap to these headers; this only satisfies the signature.
_HEADER_CHECKED = 2**62


def prepare_encoded(
    encoded: list[bytes], orientations: list[int], *, inference: InferenceConfig, device: torch.device
) -> list[PreparedImage | str]:
    """JPEG bytes -> one `PreparedImage` (pixels on ``device``) or an error message per image, in order."""
    streams = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]  # each [n_bytes]
    decoded = _decode_on_device(streams, device)  # each [3, H, W] uint8 on device, or None
    prepared: list[PreparedImage | str] = []
    for data, orientation, pixels in zip(encoded, orientations, decoded):
        if pixels is not None:
            prepared.append(prepare_tensor(pixels, int(orientation), inference))
            continue
        try:  # what the device decoder refused: Pillow, as on the CPU path
            cpu_pixels, width, height = decode_image(data, max_pixels=_HEADER_CHECKED, inference=inference)
            prepared.append(PreparedImage(cpu_pixels, (height, width)))
        except (ValueError, MemoryError) as exc:
            prepared.append(str(exc) or f"undecodable: {type(exc).__name__}")
    return prepared


def _decode_on_device(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Batched `decode_jpeg` to RGB; after a failure each stream alone; None where the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg  # torchvision only with --device-preprocess (~2.5 s)

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its codecs in favour of TorchCodec; they still work (see README).
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities", category=DeprecationWarning)
        try:
            return list(decode_jpeg(streams, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:  # includes CUDA out-of-memory
            if len(streams) > 1:
                log.info("batched JPEG decode on %s failed (%s); decoding one by one", device, exc)
        out: list[torch.Tensor | None] = []
        for stream in streams:
            try:
                out.append(decode_jpeg(stream, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out
