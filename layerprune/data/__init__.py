"""Text sources (local data directory or the hub) and calibration sampling."""

from layerprune.data.calibration import CalibSet, sample_c4_windows, sample_windows
from layerprune.data.sources import SOURCES, check_datasets, data_dir, load_documents, load_text

__all__ = ["SOURCES", "CalibSet", "check_datasets", "data_dir", "load_documents", "load_text", "sample_c4_windows", "sample_windows"]
