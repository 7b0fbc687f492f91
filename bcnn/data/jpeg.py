"""The batched path's JPEG decoder (data.decode=gpu): TorchCodec's, or torchvision's where TorchCodec is missing.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (0.16+), which took them over. `python -m
bcnn.bench --decoders` compares them (docs/speed.md has the figures): on this project's CPU the same pixels as
torchvision's and as PIL's, bit for bit, for every kind of JPEG the datasets hold, and the same speed (TorchCodec /
torchvision 0.99 to 1.02 over four runs). TorchCodec installs from the package index alone, with no FFmpeg (its
image decoders do not use it). One difference matters here: TorchCodec always turns an image by its EXIF
orientation, while bcnn's PIL path, like torchvision's decoder by default, takes the pixels as stored, as the
datasets' bounding boxes do. So a JPEG whose EXIF orientation is not 1 (exif_turned, read in the loader worker) is
decoded by PIL instead, as any file the decoder refuses.

    default_decoder()                                   # "torchcodec", or "torchvision" where it cannot
    decode_jpegs([bytes_tensor, ...], device, decoder)  # [uint8 (3, H, W) on device, ...]; RuntimeError: refused
"""

from __future__ import annotations

import functools
import io
import warnings

import torch
from PIL import ExifTags, Image


def bytes_tensor(data: bytes) -> torch.Tensor:
    """A file's bytes as the 1-d uint8 CPU tensor the decoders take (a copy torch owns, so it can be sent on)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@functools.cache
def default_decoder() -> str | None:
    """ "torchcodec" when it is installed and decodes (a TorchCodec built for another torch imports, then fails to
    load its library at the first call: one small JPEG is decoded to find out), else "torchvision" while its
    deprecated decoder is still there, else None."""
    try:
        from torchcodec.decoders import decode_jpeg
        probe = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(probe, "JPEG")
        decode_jpeg(bytes_tensor(probe.getvalue()))
        return "torchcodec"
    except Exception:
        pass
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
        return "torchvision"
    except ImportError:
        return None


def decode_jpegs(data: list[torch.Tensor], device: torch.device, decoder: str) -> list[torch.Tensor]:
    """JPEG files' bytes (1-d uint8 CPU tensors) -> RGB uint8 (3, H, W) images on `device`, in one batched call
    (one nvJPEG call on a GPU) of `decoder`, "torchcodec" or "torchvision"."""
    if decoder == "torchcodec":
        from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg
        return torchcodec_decode_jpeg(list(data), mode="RGB", device=device)
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        # Deprecated in torchvision 0.29 for TorchCodec, which is used instead when installed; this is the fallback
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
        return decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)


def exif_turned(data: bytes) -> bool:
    """The JPEG's EXIF orientation asks a viewer to turn or mirror it (any value but 1). Reads the header only;
    a file PIL cannot open counts as not turned (the decoder then refuses it, and PIL names the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.getexif().get(ExifTags.Base.Orientation, 1) != 1
    except Exception:
        return False
