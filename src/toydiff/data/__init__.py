"""The data: the synthetic zoo, the dataset registry, the user's tables, and the scaler into the model's frame."""
