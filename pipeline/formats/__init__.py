"""What a run directory holds and how it is read and written: the samples dataset, directions
files, identity records, images and figure files."""
