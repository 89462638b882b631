#!/bin/sh
# Regenerates the bundled labels of the sample images that examples/train_segmenter.py trains on:
# examples/sample-labels (diffcut label) and examples/sample-classes (jobs/discover.py, 4 classes).
# The tiny random model (no download): the labels are meaningless, small, and quick to make.
# Run from the repository root: sh examples/make_sample_labels.sh
set -e
python jobs/label.py --input samples --output examples/sample-labels --model tiny-random --device cpu \
    --resolution 256 --mask-size 96 --ncut-cpus 0.5 --extractor-cpus 0.5 --overwrite
python jobs/discover.py --input examples/sample-labels --output examples/sample-classes --num-classes 4 --overwrite
