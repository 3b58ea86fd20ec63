"""Operations on stored sets: copy, shuffle, export, push, stats, diff, inventory, cleanup, reproduce."""
