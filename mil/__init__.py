"""Multiple-instance learning for leukemia cytology: from smear images to a patient's diagnosis."""

__version__ = "0.1.0"
