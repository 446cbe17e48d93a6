"""Text sources (local data directory or the hub) and calibration sampling."""

from layerprune.data.calibration import CalibSet, sample_c4_windows, sample_windows
from layerprune.data.sources import SOURCES, data_dir, load_text, load_documents

__all__ = ["SOURCES", "CalibSet", "data_dir", "load_documents", "load_text", "sample_c4_windows", "sample_windows"]
