"""vertrefine: CT-quality vertebra segmentations from thick-slice MRI with an LSD-EBM shape prior."""

__version__ = "0.1.0"
