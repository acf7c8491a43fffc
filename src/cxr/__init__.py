"""cxr: chest X-ray classification with correct DICOM handling, tracked training, tuning and serving."""

__version__ = "0.1.0"
