"""Synthetic bone-marrow smear cohorts in the Zenodo layout (`mil synth`, PRODUCT.md 2.5)."""

from mil.synth.config import DEFAULT_SYNTH_CONFIG, DiagnosisConfig, SynthConfig, config_from_dict, load_synth_config

__all__ = ["DEFAULT_SYNTH_CONFIG", "DiagnosisConfig", "SynthConfig", "config_from_dict", "load_synth_config"]
