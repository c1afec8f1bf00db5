"""semipd process roles: controller, prefill, decode, scm."""
