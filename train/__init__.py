"""train: unpaired UNIT training, synthetic low-dose CT, and evaluation."""
