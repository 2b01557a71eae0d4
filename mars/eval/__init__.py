"""Evaluation: the MARS-Shapes benchmark, captioning accuracy, FID, CLIP score and the
prompt-suite runners for COCO-30K, GenEval and T2I-CompBench (`mars eval ...`)."""
