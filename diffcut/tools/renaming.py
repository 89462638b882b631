"""Naming re-thresholded rows again (:class:`Renamer`), for :mod:`diffcut.tools.rethreshold`.

Merged segments need new names, and the old ones cannot be combined into them
(a class is not a mean of classes): the image is read again from the row's
``source`` (:class:`diffcut.tools.gallery.SourceReader`) and named with the
vocabulary and CLIP its ``params`` record, or the ones passed instead.
"""

from __future__ import annotations

import json
from typing import Any

from diffcut.job import schema


class Renamer:
    """Names re-thresholded rows again, reading each image from its ``source``.

    ``vocabulary`` / ``naming_model``: None takes what the row's ``params``
    recorded. One :class:`diffcut.method.naming.SegmentNamer` per (model, vocabulary)
    met, loaded on first use (the text classifier is computed once for each).
    """

    def __init__(
        self,
        vocabulary: str | None = None,
        naming_model: str | None = None,
        *,
        device: str = "cpu",
        images_root: str | None = None,
        image_column: str = "image",
        max_image_pixels: int | None = None,
    ):
        from diffcut.job.inputs import DEFAULT_MAX_IMAGE_PIXELS
        from diffcut.tools.gallery import SourceReader

        self.vocabulary, self.naming_model, self.device = vocabulary, naming_model, device
        self.reader = SourceReader(images_root, image_column=image_column)
        self.max_image_pixels = max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
        self._namers: dict[tuple[str, str], Any] = {}
        self.renamed = 0
        self.failed = 0

    def _namer(self, naming_model: str, vocabulary: str):
        key = (naming_model, vocabulary)
        if key not in self._namers:
            from diffcut.method.naming import SegmentNamer

            self._namers[key] = SegmentNamer(naming_model, vocabulary, device=self.device)
        return self._namers[key]

    def _image_bytes(self, source: str) -> bytes:
        from diffcut.job.webdataset import split_source

        if split_source(source) is not None:
            raise ValueError("WebDataset sources (shard.tar#key) are not read back one sample at a time")
        return self.reader.read(source)

    def __call__(self, row: dict) -> dict:
        """The named version of a re-thresholded ok ``row``, or an error row saying why not; never raises."""
        from diffcut.job.inputs import decode_image, redact
        from diffcut.method.naming import DEFAULT_NAMING_MODEL

        params = json.loads(row["params"]) if row.get("params") else {}
        vocabulary = self.vocabulary or params.get("vocabulary")
        naming_model = self.naming_model or params.get("naming_model") or DEFAULT_NAMING_MODEL
        params.update(vocabulary=vocabulary, naming_model=naming_model)
        row["params"] = schema.params_json(params)
        try:
            if vocabulary is None:
                raise ValueError("its params record no vocabulary; pass --vocabulary")
            try:
                data = self._image_bytes(row["source"])
            except Exception as error:  # noqa: BLE001 - moved, deleted, no credentials...
                raise ValueError(
                    f"the image could not be read from its source {row['source']!r}: {type(error).__name__}: {error}"
                ) from None
            size = (row["mask_width"], row["mask_height"])
            pixels = decode_image(data, size, max_pixels=self.max_image_pixels).pixels
            namer = self._namer(naming_model, vocabulary)
            names = namer.name(pixels, schema.decode_mask(row["mask"]), row["num_segments"])
            self.renamed += 1
            return schema.named_row(row, names, namer.vocabulary.class_names)
        except Exception as error:  # noqa: BLE001 - one image's failure is one error row
            self.failed += 1
            return schema.error_row(
                row["image_id"],
                row["source"],
                redact(f"re-naming failed: {type(error).__name__}: {error}"),
                params=row["params"],
                width=row["width"],
                height=row["height"],
            )
