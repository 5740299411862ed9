"""Model conversion (Keras/SavedModel -> TFLite), datasets, and the accuracy gate."""
