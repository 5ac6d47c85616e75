"""Stage 1: decode, find the face, align like PanoHead, estimate the camera, matte."""
from .decode import DecodedImage, load_image
from .stage import preprocess

__all__ = ["preprocess", "load_image", "DecodedImage"]
