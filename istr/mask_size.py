"""The side of the box-cropped masks that every codec embeds and the criterion compares (docs/method.md#mask-embedding).

A leaf module, so that the config checks ``codec.dim`` against it without importing the codecs.
"""

MASK_SIZE = 28
