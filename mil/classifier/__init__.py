"""The cell-type classifier: crops of a cell table -> timm backbone -> class probabilities per cell.

Import the pieces from their modules (mil.classifier.train, .predict, ...); this package imports nothing heavy.
"""
