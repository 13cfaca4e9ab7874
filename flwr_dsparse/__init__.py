"""flwr-dsparse: DSparse sparse update and grouped aggregation for Flower.

The core (units, costs, scoring, planner, trainer) is pure PyTorch and never
imports ``flwr``; the Flower strategy and apps build on it.
"""

__version__ = "0.1.0"
