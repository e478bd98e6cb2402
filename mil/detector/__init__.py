"""The cell detector: Faster R-CNN (trained) and a classical nucleus-threshold baseline, with tiled inference.

Import the pieces from their modules (mil.detector.train, .predict, .tiling, ...); this package imports nothing heavy.
"""
