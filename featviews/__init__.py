"""Views and their targets: the one home of "a target follows its view".

Extraction, the view bank, the trainer and the audit all draw, render and read through here:

* ``draw``: the view draw rules (official, grid-aligned, the evaluation view);
* ``geometry``: a batch of views on the device, and view px -> tile px;
* ``render``: the one renderer (level canvases, bank views, training views, masks);
* ``levels``: which cached level a view reads, and the scale blend;
* ``sample``: targets sampled from cached grids at the student's token grid, CutMix of targets;
* ``bank``: the exact view bank's draw and reads;
* ``sources``: one registered target source per mode (warp, grid_aligned, view_bank, online);
  items carry cached grids encoded (``EncodedGrid``) and the source decodes them on the training
  device (``decode``: every registered codec, in torch);
* ``pos_embed``: DINOv2's position-grid resampling, shared by students and teachers.

Depends on featstore and torch only; pipelines and trainer import it.
"""
