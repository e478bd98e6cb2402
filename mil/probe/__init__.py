"""How good an encoder is for cells and for patients: kNN and linear probes of the cell labels in a bag folder,
and a mean-pooling probe of the diagnosis, with grouped cross-validation and bootstrap CIs (`mil probe`)."""
