"""Data: the t15 HDF5 layout, the synthetic generator, sampling, batching and augmentation."""
