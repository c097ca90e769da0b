"""rbrm-pipeline: SFT, a learned reward model, a rule-based reward model and PPO for safety tuning.

Importing the package is cheap: the stages import torch and transformers when they run.
"""

__version__ = "0.1.0"
