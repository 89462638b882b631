"""The method: DiffCut itself, as plain functions and classes on arrays.

Image pixels in, float16 features, label maps, split trees, segment embeddings
and class names out (features, ncut, assign, refine, segmenter, naming; tiny
builds the randomly initialised test models), as docs/method.md defines them;
ncut_reference is the plain definition of the recursive cut, ncut its fast path.

Dependency direction: this package imports nothing else of diffcut (not
``diffcut.job``, ``diffcut.evaluation``, ``diffcut.tools`` nor the CLI), no Ray and
no dataset filesystem layer (fsspec, s3fs, pyarrow.fs). Everything else uses the
method; the method uses nothing of them. tests/test_layout.py checks it.
"""
