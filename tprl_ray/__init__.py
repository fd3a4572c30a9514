"""tprl-ray: learn which visual tokens a vision-language model can drop, with RL on Ray."""

__version__ = "0.1.0"
