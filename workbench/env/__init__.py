"""The machine the workbench runs on: predictability environment, checks and physical floors."""
