"""Co2S: heterogeneous dual students with cached text guidance (issue 17).

Modules: ``clip_backbone`` and ``dino_backbone`` (the two ViT students' feature pyramids),
``decoder`` (the cost-volume head), ``student`` (``build_co2s_student``, the API the ``co2s``
method uses), ``losses``, ``views``, ``sliding`` (the step and evaluation). Nothing is imported
here so that the light modules do not pull in timm/open_clip.
"""
