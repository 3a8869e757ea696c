"""The sizes every part agrees on, in a module without torch so the config checks can read them."""

# Every backbone gives this many features, so the one adapter `linear_512_10` fits them all.
FEATURES = 512
# One logit per digit.
CLASSES = 10
