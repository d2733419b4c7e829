"""What people see: how each figure is drawn, what each shows, animations, and the self-contained HTML reports."""
