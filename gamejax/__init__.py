"""gamejax: train language models by playing two-player language games, in JAX.

Every training regime is a game plus a payoff, played by one compiled step
(``gamejax.step``); see README.md for the map of the package.
"""
__version__ = "0.1.0"
