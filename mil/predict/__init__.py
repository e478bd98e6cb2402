"""`mil predict`: apply the models a comparison saved to new patients (ensemble by default)."""
