pub mod utf7;
