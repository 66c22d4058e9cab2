"""How INT8 calibration samples its data (``xmr calibrate``'s options), apart from the code
that collects it, so the command line reads the choices without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from xmr.errors import CalibrationError

CALIBRATION_SPLITS = ("train", "dev")
METHODS = ("minmax", "entropy", "percentile")
MIN_IMAGES = 4


@dataclass
class CalibrationConfig:
    split: str = "train"
    images: int = 128  # images sampled from the split; all their captions are used
    method: str = "minmax"
    percentile: float = 99.999  # "percentile" method only
    seed: int = 0
    image_batch: int = 16  # images per image-encoder batch
    caption_batch: int = 40  # captions per text-encoder batch and per pair-scorer block
    pair_images: int = 8  # images per pair-scorer block: half the captions' own, half others

    def validate(self) -> None:
        if self.split not in CALIBRATION_SPLITS:
            raise CalibrationError(f"calibration reads the train or dev split, not {self.split!r} "
                                   f"(scales fitted on the test split would flatter its accuracy)")
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.images < MIN_IMAGES:
            raise CalibrationError(f"--calibration-images {self.images} is too small: use at least {MIN_IMAGES}")
        if not 0 < self.percentile <= 100:
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile}")
        for name in ("image_batch", "caption_batch", "pair_images"):
            if getattr(self, name) < 1:
                raise CalibrationError(f"{name} must be at least 1, got {getattr(self, name)}")
