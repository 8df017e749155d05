"""The experiment runners behind ``trl-alp demo|stress|bench|mismatch|plot``."""
