"""imkd: deployment engine for IMKD camera+radar 3D object detection."""

__version__ = "0.1.0"
