"""A static HTML gallery of labeled images, for a person to judge label quality.

:func:`build_gallery` reads a labeling job's output row by row and writes

* ``index.html``, ``page-2.html``, ...: ``per_page`` images per page, each with
  its picture, the coloured segments blended over it with the boundaries
  between segments drawn (:func:`diffcut.tools.visualize.overlay`), the coloured
  label map alone, the segment count, the sizes and the run's parameters
  (tau, alpha, model);
* ``errors.html``: every error row with its message;
* ``thumbs/``: the small pictures (JPEG for the image, PNG for the label
  pictures), named by :func:`diffcut.tools.export.safe_stem` of the image id.

The labels do not hold the images: each is read again from the row's
``source`` (a local path, an ``s3://`` URI, or ``file.parquet#row=N`` for
Parquet inputs) through :mod:`diffcut.job.inputs` and decoded with
:func:`diffcut.job.inputs.decode_image`. When it cannot be read (moved, deleted, no
credentials) the card shows the coloured label map alone with a note saying
why. Nothing in the pages refers outside the gallery folder; open
``index.html`` in any browser, from disk or any static file server.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from diffcut.job import schema

__all__ = ["build_gallery", "GallerySummary", "SourceReader", "page_name", "thumbnail_size"]

DEFAULT_PER_PAGE = 50
DEFAULT_THUMB_SIZE = 256
THUMBS_DIR = "thumbs"
ERRORS_PAGE = "errors.html"

_PARQUET_ROW = re.compile(r"^(?P<file>.+)#row=(?P<row>\d+)$")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}
nav{margin:.8em 0}nav a,nav span{margin-right:.6em}
.params{font-size:.85em;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:1em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em;max-width:100%}
.card .pics{display:flex;gap:.4em;align-items:flex-start}
.card img{display:block;max-width:100%;image-rendering:pixelated}
.card .caption{font-size:.8em;margin-top:.4em;word-break:break-all}
.note{color:#a40;font-size:.8em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.3em .5em;text-align:left;
vertical-align:top;word-break:break-all}
"""

# Marks the page once every picture has loaded (or failed), for people and for automated checks:
# body[data-images-loaded] = pictures shown, body[data-images-broken] = pictures that did not decode.
_SCRIPT = """
function diffcutCheckImages(){
  var images=Array.prototype.slice.call(document.images);
  if(!images.every(function(i){return i.complete;})){setTimeout(diffcutCheckImages,50);return;}
  var broken=images.filter(function(i){return !(i.naturalWidth>0);}).length;
  document.body.setAttribute('data-images-loaded',String(images.length-broken));
  document.body.setAttribute('data-images-broken',String(broken));
  var status=document.getElementById('image-status');
  if(status){status.textContent=broken?broken+' picture(s) failed to load':'';}
}
window.addEventListener('load',diffcutCheckImages);
"""


# --------------------------------------------------------------------------- helpers
def page_name(page: int) -> str:
    """File of page ``page`` (1-based): ``index.html``, then ``page-2.html``, ..."""
    return "index.html" if page == 1 else f"page-{page}.html"


def thumbnail_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is at most ``longest`` (never enlarged), each >= 1."""
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class SourceReader:
    """The bytes of an image from a row's ``source``.

    ``source`` is a local path (relative ones are resolved against
    ``images_root`` when given), an ``s3://`` URI, or ``file.parquet#row=N``
    (row N, 0-based, of a Parquet input; the image is in ``image_column``,
    binary or the Hugging Face ``{bytes, path}`` struct). The last Parquet row
    group read is kept, since the rows of one group come one after another.
    """

    def __init__(self, images_root: str | None = None, image_column: str = "image"):
        self.images_root = images_root
        self.image_column = image_column
        self._group_key: tuple[str, int] | None = None
        self._group_values: list | None = None
        self._group_start = 0

    def _resolve(self, uri: str) -> str:
        if self.images_root and "://" not in uri and not os.path.isabs(uri):
            from diffcut.job.inputs import join_uri

            return join_uri(self.images_root, uri)
        return uri

    def read(self, source: str) -> bytes:
        from diffcut.job.inputs import open_filesystem

        match = _PARQUET_ROW.match(source)
        if match and match.group("file").lower().endswith(".parquet"):
            return self._parquet_row(self._resolve(match.group("file")), int(match.group("row")))
        fs, path = open_filesystem(self._resolve(source))
        return fs.cat_file(path)

    def _parquet_row(self, uri: str, row: int) -> bytes:
        import pyarrow.parquet as pq

        from diffcut.job.inputs import open_filesystem

        if (
            self._group_key is None
            or self._group_key[0] != uri
            or not (self._group_start <= row < self._group_start + len(self._group_values))
        ):
            fs, path = open_filesystem(uri)
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle, pre_buffer=False)
                start = 0
                for group in range(parquet.metadata.num_row_groups):
                    size = parquet.metadata.row_group(group).num_rows
                    if start <= row < start + size:
                        table = parquet.read_row_group(group, columns=[self.image_column], use_threads=False)
                        self._group_key, self._group_start = (uri, group), start
                        self._group_values = table.column(self.image_column).to_pylist()
                        break
                    start += size
                else:
                    raise FileNotFoundError(f"{uri} has no row {row}")
        value = self._group_values[row - self._group_start]
        if isinstance(value, dict):
            value = value.get("bytes")
        if value is None:
            raise FileNotFoundError(f"row {row} of {uri} has no image bytes")
        return value


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _params(text: str | None) -> dict:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def _params_line(params: Mapping[str, Any]) -> str:
    parts = [f"{key} {params[key]}" for key in ("tau", "alpha", "model") if key in params]
    if "rethresholded_from" in params:
        parts.append(f"re-thresholded from tau {params['rethresholded_from']}")
    return " · ".join(parts)


# --------------------------------------------------------------------------- pages
@dataclass
class GallerySummary:
    """What :func:`build_gallery` wrote."""

    output: str
    pages: int = 0
    images: int = 0
    with_picture: int = 0
    without_picture: int = 0
    error_rows: int = 0
    thumbnails: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _page(title: str, heading: str, body: str, nav: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title><meta name="viewport" content="width=device-width">'
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head>\n<body>\n"
        f'<h1>{heading}</h1>\n{nav}\n<p id="image-status" class="note"></p>\n{body}\n{nav}\n</body></html>\n'
    )


def _nav(page: int | None, pages: int, errors: int) -> str:
    """Links between pages; ``page`` None for the errors page."""
    if page is None:
        return '<nav><a href="index.html">back to the gallery</a></nav>'
    links = []
    if page > 1:
        links.append(f'<a href="{page_name(page - 1)}" rel="prev">&larr; previous</a>')
    for other in range(1, pages + 1):
        if other == page:
            links.append(f"<span><b>{other}</b></span>")
        elif abs(other - page) <= 5 or other in (1, pages):
            links.append(f'<a href="{page_name(other)}">{other}</a>')
    if page < pages:
        links.append(f'<a href="{page_name(page + 1)}" rel="next">next &rarr;</a>')
    links.append(f'<a href="{ERRORS_PAGE}">errors ({errors})</a>' if errors else "<span>no error rows</span>")
    return "<nav>" + " ".join(links) + "</nav>"


def _card(row: Mapping[str, Any], files: Mapping[str, str], note: str | None, params: Mapping[str, Any]) -> str:
    def img(kind: str, alt: str) -> str:
        return (
            f'<img src="{THUMBS_DIR}/{quote(files[kind])}" alt="{html.escape(alt)}" '
            f'title="{html.escape(alt)}" decoding="async">'
        )

    pictures = []
    if "image" in files:
        pictures.append(img("image", "image"))
        pictures.append(img("overlay", "segments over the image, with boundaries"))
    pictures.append(img("mask", "segments with boundaries"))
    size = f"{row['width']}×{row['height']}" if row.get("width") else "?"
    lines = [
        f"<b>{html.escape(str(row['image_id']))}</b>",
        f"{row['num_segments']} segments · image {size} · mask {row['mask_width']}×{row['mask_height']}",
        html.escape(_params_line(params)),
    ]
    if note:
        lines.append(f'<span class="note">{html.escape(note)}</span>')
    return (
        '<div class="card"><div class="pics">'
        + "".join(pictures)
        + '</div><div class="caption">'
        + "<br>".join(lines)
        + "</div></div>"
    )


def build_gallery(
    labels: str,
    output: str,
    *,
    per_page: int = DEFAULT_PER_PAGE,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    images_root: str | None = None,
    image_column: str = "image",
    limit: int | None = None,
    title: str | None = None,
    overlay_alpha: float = 0.5,
) -> GallerySummary:
    """Write the gallery of the labels under ``labels`` into the folder ``output`` (local or ``s3://``).

    Args:
        labels: a labeling job's output.
        output: the gallery folder (created; files of an earlier gallery are replaced).
        per_page: images per page.
        thumb_size: longest side of the thumbnails, in pixels.
        images_root: where relative local sources are (default: the current directory).
        image_column: the image column of Parquet inputs.
        limit: show at most this many labeled images (error rows are all listed).
        title: page title (default: the labels' location).
        overlay_alpha: weight of the segment colours in the overlay.
    """
    from diffcut.evaluation.protocol import resize_nearest
    from diffcut.job.inputs import check_uri, decode_image, describe_exception, join_uri, open_filesystem
    from diffcut.tools.export import UniqueNames, iter_label_rows
    from diffcut.tools.visualize import BOUNDARY_COLOR, boundaries, colorize, overlay

    if per_page < 1 or thumb_size < 1:
        raise ValueError("--per-page and --thumb-size must be at least 1")
    output = check_uri(output)
    title = title or f"diffcut labels: {labels}"
    summary = GallerySummary(output=output)

    # A first, light pass over short columns gives the page count and the runs' settings for every page.
    labeled = total_errors = 0
    parameter_sets: dict[str, int] = {}
    for row in iter_label_rows(labels, ["source", "status", "params"]):
        if row["status"] == schema.STATUS_OK:
            labeled += 1
            parameter_sets[row["params"] or ""] = parameter_sets.get(row["params"] or "", 0) + 1
        else:
            total_errors += 1
    # Created once labels were read: a wrong --input leaves no gallery folder behind.
    fs, root = open_filesystem(output)
    fs.makedirs(root.rstrip("/") + "/" + THUMBS_DIR, exist_ok=True)

    def write(relative: str, data: bytes) -> None:
        fs.pipe_file(open_filesystem(join_uri(output, relative))[1], data)

    shown = labeled if limit is None else min(labeled, max(0, int(limit)))
    pages = max(1, math.ceil(shown / per_page))
    summary.pages = pages
    settings = "; ".join(f"{html.escape(_params_line(_params(p)))} ({n} images)" for p, n in parameter_sets.items())
    # Pages of an earlier, longer gallery in the same folder would be reachable from nowhere: remove them.
    for path in fs.ls(root, detail=False):
        match = re.fullmatch(r"page-(\d+)\.html", path.rsplit("/", 1)[-1])
        if match and int(match.group(1)) > pages:
            fs.rm(path)

    reader = SourceReader(images_root, image_column)
    names = UniqueNames()
    errors: list[tuple[str, str, str]] = []
    cards: list[str] = []
    page = 1

    def flush() -> None:
        nonlocal cards, page
        heading = (
            f'{html.escape(title)}<div class="params">page {page} of {pages} · {shown} labeled images'
            f" · {total_errors} error rows · {settings}</div>"
        )
        write(
            page_name(page),
            _page(
                f"{title} ({page}/{pages})",
                heading,
                '<div class="grid">' + "\n".join(cards) + "</div>",
                _nav(page, pages, total_errors),
            ).encode("utf-8"),
        )
        cards, page = [], page + 1

    columns = [
        "image_id",
        "source",
        "status",
        "error",
        "width",
        "height",
        "mask",
        "mask_width",
        "mask_height",
        "num_segments",
        "params",
    ]
    for row in iter_label_rows(labels, columns):
        if row["status"] != schema.STATUS_OK:
            errors.append((row["image_id"], row["source"], row["error"] or "unknown error"))
            summary.error_rows += 1
            continue
        if summary.images >= shown:
            continue
        mask = schema.decode_mask(row["mask"])
        thumb_w, thumb_h = thumbnail_size(mask.shape[1], mask.shape[0], thumb_size)
        small = resize_nearest(mask, (thumb_h, thumb_w))
        stem = names(row["image_id"])
        files = {"mask": f"{stem}.mask.png"}
        pictures = {"mask": colorize(small)}
        pictures["mask"][boundaries(small)] = BOUNDARY_COLOR
        note = None
        try:
            image = decode_image(reader.read(row["source"]), size=(thumb_w, thumb_h)).pixels
            files.update(image=f"{stem}.jpg", overlay=f"{stem}.overlay.png")
            pictures.update(image=image, overlay=overlay(image, small, alpha=overlay_alpha))
            summary.with_picture += 1
        except Exception as error:  # noqa: BLE001 - any failure to get the picture: show the labels alone
            note = f"image unavailable ({describe_exception(error)}): the segments are shown alone"
            summary.without_picture += 1
        for kind, pixels in pictures.items():
            write(f"{THUMBS_DIR}/{files[kind]}", _jpeg(pixels) if kind == "image" else _png(pixels))
            summary.thumbnails += 1
        cards.append(_card(row, files, note, _params(row["params"])))
        summary.images += 1
        if len(cards) == per_page:
            flush()
    if cards or summary.images == 0:
        flush()

    rows = "\n".join(
        f"<tr><td>{html.escape(str(image_id))}</td><td>{html.escape(str(source))}</td>"
        f"<td>{html.escape(str(message))}</td></tr>"
        for image_id, source, message in errors
    )
    body = (
        (
            f"<p>{len(errors)} image(s) could not be labeled.</p><table><tr><th>image id</th><th>source</th>"
            f"<th>error</th></tr>\n{rows}\n</table>"
        )
        if errors
        else "<p>No error rows.</p>"
    )
    write(
        ERRORS_PAGE,
        _page(f"{title}: errors", f"{html.escape(title)}: error rows", body, _nav(None, pages, total_errors)).encode(
            "utf-8"
        ),
    )
    return summary
