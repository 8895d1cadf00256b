"""Functionality-oriented pruning: what each filter does, which filters repeat each other,
pruning the repetitions, and how fine-tuning changes the survivors ("defection").

Pipeline (each step is a function a notebook user can call on its own)::

    descriptors.describe_filters --> clustering.filter_similarity / cka_similarity
        --> clustering.cluster_filters --> clustering.keep_representatives --> masks
        --> pruning.compare_pruning (physically smaller model, accuracy before/after
            fine-tuning, against magnitude pruning of the same number of filters)
        --> defection.defection (descriptor drift of the surviving filters)

Removal semantics are the project's (:func:`netcarve.core.hooks.apply_filter_masks`): a removed
filter outputs exactly 0 after its BatchNorm.
"""
