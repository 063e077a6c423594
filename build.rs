// The CLI is a 40 MB executable, mostly polars; as a position-independent
// executable it spends ~3 ms of every start applying ~80,000 relocations.
// A fixed-address executable has them resolved at link time.
fn main() {
    println!("cargo:rustc-link-arg-bin=liverseg=-no-pie");
}
