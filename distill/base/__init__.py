"""The bottom of the package: what every stage shares (errors, batches, paths, seeds, optional packages, image
grids). Nothing here imports another part of `distill`."""
