"""Training: the teacher, the students, the memory and colour maps, synthetic anomalies."""
