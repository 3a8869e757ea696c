"""The sizes and stems every part agrees on, in a module without torch so the config checks can read them."""

# Every backbone gives this many features, so the one adapter `linear_512_10` fits them all.
FEATURES = 512
# One logit per digit.
CLASSES = 10
# The backbones' first layers: ImageNet's 7x7 convolution, or two 3x3 ones for digits, with the
# residual blocks at 7x7 (digits) or 14x14 (digits14).
STEMS = ("imagenet", "digits", "digits14")
