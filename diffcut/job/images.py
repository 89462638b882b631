"""Image bytes to pixels: robust decoding of untrusted images, and the model's input size.

* **Decoding.** :func:`decode_image` turns untrusted bytes into an RGB array or
  raises :class:`ImageDecodeError` with a message a person understands: a
  declared size over the pixel limit is refused before any pixel is decoded
  (decompression bombs), EXIF orientation is applied, every PIL colour mode
  becomes 8-bit RGB, animated images give their first frame, and large JPEGs
  are decoded at a reduced DCT scale (``draft``) when the model needs fewer
  pixels.
* **Sizes.** :func:`model_size` gives the model's input size (``square``: the
  paper's resolution x resolution; ``bucket``: aspect-preserving, about
  resolution**2 pixels, sides multiples of the stride), :class:`MaskSize` the
  output label-map size.

Plain Python on bytes and arrays (no Ray, no filesystem).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffcut.job.boundary import describe_error
from diffcut.job.storage import InputError

#: Pixel stride of the feature map of every supported model (SD 1.x/2.x and the
#: SDXL family: VAE /8, then two UNet downsamplings before the feature block).
DEFAULT_STRIDE = 32

#: Images declaring more pixels than this are refused before decoding. Equal to
#: the size at which PIL itself raises DecompressionBombError by default; an
#: 8000 x 6000 photo (48 MP) is far below it.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

RESIZE_MODES = ("bucket", "square")


class ImageDecodeError(ValueError):
    """One image could not be used; the message becomes the row's ``error``."""


# =========================================================================== sizes
def bucket_size(width: int, height: int, resolution: int, stride: int = DEFAULT_STRIDE) -> tuple[int, int]:
    """Aspect-preserving model input size of about ``resolution**2`` pixels, sides multiples of ``stride``.

    The width is the multiple of ``stride`` nearest to
    ``sqrt(resolution**2 * width / height)`` and the height follows from the
    area, so every aspect ratio maps to one of a fixed set of buckets (one per
    width) and images of one bucket batch together. No side exceeds
    ``resolution**2 / stride``, which keeps the feature grid at about
    ``(resolution / stride)**2`` cells even for extreme panoramas.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = resolution * resolution
    longest = max(stride, (area // stride) // stride * stride)
    bucket_width = round(math.sqrt(area * width / height) / stride) * stride
    bucket_width = min(longest, max(stride, bucket_width))
    bucket_height = min(longest, max(stride, round(area / bucket_width / stride) * stride))
    return int(bucket_width), int(bucket_height)


def model_size(
    width: int, height: int, resolution: int, resize: str = "bucket", stride: int = DEFAULT_STRIDE
) -> tuple[int, int]:
    """(width, height) the model sees for a ``width`` x ``height`` image.

    ``square``: resolution x resolution, as in the paper (1024 x 1024).
    ``bucket``: :func:`bucket_size`.
    """
    if resize == "square":
        return int(resolution), int(resolution)
    if resize == "bucket":
        return bucket_size(width, height, resolution, stride)
    raise InputError(f"unknown resize mode {resize!r}; use one of {', '.join(RESIZE_MODES)}")


def check_resolution(resolution: int, stride: int = DEFAULT_STRIDE) -> None:
    if int(resolution) < stride or int(resolution) % stride:
        raise InputError(f"--resolution must be a positive multiple of the model stride {stride}; got {resolution}")


@dataclass(frozen=True)
class MaskSize:
    """Size of the output label map: ``original`` (the image's own size), ``model``
    (the model input size), ``N`` (longest side N, aspect kept) or ``WxH``."""

    kind: str
    width: int | None = None
    height: int | None = None

    @classmethod
    def parse(cls, text: str | int | MaskSize) -> MaskSize:
        if isinstance(text, MaskSize):
            return text
        value = str(text).strip().lower()
        if value in ("original", "model"):
            return cls(value)
        match = re.fullmatch(r"(\d+)\s*[x,]\s*(\d+)", value)
        if match:
            width, height = int(match.group(1)), int(match.group(2))
            if width > 0 and height > 0:
                return cls("fixed", width, height)
        if value.isdigit() and int(value) > 0:
            return cls("longest", int(value), int(value))
        raise InputError(f"--mask-size must be 'original', 'model', a longest side N, or WxH; got {text!r}")

    def resolve(self, image_size: tuple[int, int], model_input_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the mask for an image of ``image_size`` run at ``model_input_size``."""
        if self.kind == "original":
            return tuple(image_size)
        if self.kind == "model":
            return tuple(model_input_size)
        if self.kind == "fixed":
            return self.width, self.height
        width, height = image_size
        scale = self.width / max(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def __str__(self) -> str:
        if self.kind in ("original", "model"):
            return self.kind
        if self.kind == "fixed":
            return f"{self.width}x{self.height}"
        return str(self.width)


# =========================================================================== decoding
@dataclass
class DecodedImage:
    """An image ready for the model: ``pixels`` (h, w, 3) uint8 RGB at the requested
    size; ``width`` x ``height`` the image's own size after EXIF orientation."""

    pixels: np.ndarray
    width: int
    height: int


_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def _describe_bytes(data: bytes) -> str:
    # The size only: a message must never quote a file's content (it may be anything, a secret included).
    return f"{len(data):,} bytes"


def _open(data: bytes | None, max_pixels: int):
    """Open ``data`` lazily (header only) after the emptiness and size checks."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise ImageDecodeError("no image bytes")
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    # PIL refuses images over 2 * MAX_IMAGE_PIXELS on its own; make room when the
    # configured limit is higher, the check below is the one that applies.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # PIL's own guard (at 2 * Image.MAX_IMAGE_PIXELS) fired first; same verdict, our wording.
        declared = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(declared.group(1)):,} pixels" if declared else "too many pixels"
        raise ImageDecodeError(
            f"the image declares {size}, more than the limit of {min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS):,} "
            "(--max-image-pixels); refused without decoding it (decompression-bomb guard)"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image in a format PIL can read ({_describe_bytes(data)})") from None
    except Exception as error:  # noqa: BLE001 - any header failure is a bad input
        raise ImageDecodeError(f"cannot read the image header: {describe_error(error)}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"the image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the {image.format} image declares {width}x{height} = {width * height:,} pixels, more than the limit "
            f"of {max_pixels:,} (--max-image-pixels); refused without decoding it (decompression-bomb guard)"
        )
    return image


def _orientation(image) -> int:
    """EXIF orientation from what is already read; never decodes pixels.

    PIL's PNG ``getexif()`` decodes the whole image to look for an eXIf chunk after the
    image data; a decode failure there must reach :func:`decode_image`'s ``load()``, not be
    swallowed here (PIL marks an image loaded even when its decoding failed, so a second
    ``load()`` would return the partly filled buffer as if it were whole).
    """
    if image.format == "PNG" and image.tile and "exif" not in image.info:
        return 1  # not decoded yet: an eXIf chunk after the image data is only known once it is
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: treat as upright
        return 1


# Channels per PNG colour type (grey, RGB, palette, grey + alpha, RGBA) and Adam7's passes (x0, y0, dx, dy).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_data_size(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes the PNG's image data inflates to: filter byte + packed samples, per row of each pass."""
    bits = _PNG_CHANNELS.get(colour_type, 4) * bit_depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + -(-columns * bits // 8))
    return total


def _may_end_early(image) -> bool:
    """Whether a loaded PNG's image data may have ended before its last row. PIL starts from a zeroed
    buffer and decodes rows in order, so a last row holding a non-zero byte proves every row was
    decoded; only then is inflating the data again (as costly as PIL's own inflate) skipped."""
    if image.info.get("interlace"):
        return True  # Adam7 passes write rows out of order
    width, height = image.size
    return not any(image.crop((0, height - 1, width, height)).tobytes())


def check_png_complete(data: bytes, *, inflate: bool = True) -> None:
    """Refuse a PNG that PIL would decode only in part: a chunk whose CRC does not match, a file
    that ends before IEND, or (``inflate``) image data that inflates to fewer bytes than its header
    declares (PIL leaves the missing rows at zero and reports nothing).

    Raises:
        ImageDecodeError: naming what is wrong.
    """
    import struct
    import zlib

    position, header = 8, None
    inflater, inflated, expected, stream_done = zlib.decompressobj(), 0, None, False
    while True:
        if position + 12 > len(data):
            raise ImageDecodeError(f"the PNG ends at byte {len(data):,} before its IEND chunk: the file is truncated")
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        if end > len(data):
            raise ImageDecodeError(f"the PNG ends at byte {len(data):,} inside a chunk: the file is truncated")
        body = data[position + 8 : end - 4]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4 : end])[0]:
            name = kind.decode("ascii") if kind.isalpha() else "?"
            raise ImageDecodeError(
                f"the PNG chunk {name} at byte {position:,} fails its CRC check: the file is corrupt"
            )
        if kind == b"IHDR" and length >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
            expected = _png_data_size(header[0], header[1], header[2], header[3], bool(header[6]))
        elif kind == b"IDAT" and inflate and expected is not None and not stream_done:
            try:  # counts the inflated bytes, at most one more than expected: nothing is kept
                inflated += len(inflater.decompress(body, expected + 1 - inflated))
            except zlib.error as error:
                raise ImageDecodeError(f"the PNG image data is corrupt ({error})") from None
            stream_done = inflated > expected or inflater.eof
        elif kind == b"IEND":
            break
        position = end
    if inflate and expected is not None and inflated < expected:
        raise ImageDecodeError(
            f"the PNG image data holds {inflated:,} of the {expected:,} bytes its "
            f"{header[0]}x{header[1]} header declares: the image is incomplete"
        )


def to_rgb(image):
    """Any PIL image -> 8-bit RGB.

    16-bit and 32-bit grayscale are scaled (not clipped) to 8 bits; images
    with transparency are composited over white (transparent backgrounds are
    usually meant to be shown on white); CMYK, palette, YCbCr, 1-bit convert
    with PIL's conversions.
    """
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        levels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        levels = levels * 255.0 if np.nanmax(levels, initial=0.0) <= 1.0 else levels
        image = Image.fromarray(np.clip(np.nan_to_num(np.rint(levels)), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(f"unsupported colour mode {image.mode!r}: {describe_error(error)}") from None


def upright_size(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an encoded image after EXIF orientation, from its header only.

    Nothing is decoded, so it costs microseconds; the job uses it to order a
    batch of images by model input size before decoding them.

    Raises:
        ImageDecodeError: as :func:`decode_image` would for an empty, unknown
            or too large image.
    """
    image = _open(data, max_pixels)
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPS_AXES else (width, height)


SizeRule = Callable[[int, int], tuple[int, int]]


def decode_image(
    data: bytes | None, size: tuple[int, int] | SizeRule | None = None, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> DecodedImage:
    """Decode untrusted image bytes to an RGB array of the wanted size.

    Args:
        data: the encoded image (JPEG, PNG, WebP, BMP, TIFF, GIF...).
        size: output (width, height), or a function of the upright image's
            (width, height) returning it (e.g. ``lambda w, h: model_size(w, h, 1024)``);
            None keeps the image's size. Resizing is bilinear.
        max_pixels: images declaring more pixels are refused before decoding.

    Raises:
        ImageDecodeError: with a message for a person (empty, not an image,
            truncated, too large, unsupported mode).
    """
    from PIL import Image, ImageOps

    image = _open(data, max_pixels)
    raw_width, raw_height = image.size
    swapped = target = None
    try:
        if image.format == "JPEG":
            # Its EXIF is in the header: decode at a reduced DCT scale (1/2, 1/4, 1/8) that is still at
            # least the target size, so a 8000x6000 photo never exists at full size in memory.
            swapped = _orientation(image) in _SWAPS_AXES
            target = _target_size(size, raw_width, raw_height, swapped)
            upright = (raw_height, raw_width) if swapped else (raw_width, raw_height)
            if target[0] < upright[0] and target[1] < upright[1]:
                image.draft(None, (target[1], target[0]) if swapped else target)
        image.seek(0)  # animated GIF/PNG/WebP, multi-page TIFF: the first frame
        image.load()
    except ImageDecodeError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(f"the image data is truncated or corrupt ({describe_error(error)})") from None
    if image.format == "PNG":
        check_png_complete(data, inflate=_may_end_early(image))
    if swapped is None:  # after load(): a PNG's EXIF may follow its image data
        swapped = _orientation(image) in _SWAPS_AXES
        target = _target_size(size, raw_width, raw_height, swapped)
    width, height = (raw_height, raw_width) if swapped else (raw_width, raw_height)
    try:  # the pixels are loaded: nothing here can decode them again
        upright = ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose the image
        upright = image
    rgb = to_rgb(upright)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.shape != (target[1], target[0], 3):
        raise ImageDecodeError(f"decoding gave an array of shape {pixels.shape}, expected {(target[1], target[0], 3)}")
    return DecodedImage(pixels=pixels, width=width, height=height)


def _target_size(
    size: tuple[int, int] | SizeRule | None, raw_width: int, raw_height: int, swapped: bool
) -> tuple[int, int]:
    width, height = (raw_height, raw_width) if swapped else (raw_width, raw_height)
    target = size(width, height) if callable(size) else (tuple(size) if size is not None else (width, height))
    return int(target[0]), int(target[1])
