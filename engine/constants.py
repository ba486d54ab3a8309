"""Names every part of the product shares: the modalities and the file kinds it reads."""

MODALITIES: tuple[str, str] = ("wli", "nbi")  # white light, narrow-band imaging

# still images: training sets, image folders replayed or calibrated, slideshows (lower-case suffixes)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# video files found in folders given to calibration and frame extraction
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".ts", ".m4v", ".webm", ".mpg", ".mpeg")
