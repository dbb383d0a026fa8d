"""Data: webdataset streams, recipes, transforms, the synthetic default dataset."""
