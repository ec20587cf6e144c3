"""COCO data to SAM batches: the checked index, upright images, prompts, the batch type and its collation."""
