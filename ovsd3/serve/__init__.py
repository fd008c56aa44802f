"""`ovsd3 serve`: an image-generation web service over an OpenVINO SD3 folder."""
