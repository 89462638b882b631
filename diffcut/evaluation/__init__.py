"""Evaluation: the per-image mIoU protocol and the benchmark datasets' layouts.

protocol (Hungarian / majority matching, mIoU), datasets (COCO-Stuff, Cityscapes,
... in their released layouts).

Dependency direction: imports nothing else of diffcut (numpy, scipy and PIL
only); the tools and the CLI use it, the method and the job never do.
"""
