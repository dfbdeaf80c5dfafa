//! The manifest parser: any text is a valid manifest or an error, never a panic; a valid one
//! writes back to TOML that parses to the same manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sophon_sdk::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifest) = Manifest::from_toml(text) else {
        return;
    };
    let written = manifest.to_toml().expect("a valid manifest writes");
    let again = Manifest::from_toml(&written).expect("what was written parses");
    assert_eq!(again, manifest);
});
