//! The proptest mirror of the `normalize_rules` fuzz target: the same body, fed text full of the tricks
//! normalization undoes.

#[path = "../../../fuzz/bodies/normalize_rules.rs"]
mod body;
#[path = "../../../fuzz/bodies/regressions.rs"]
mod regressions;

use proptest::prelude::*;

proptest! {
    #[test]
    fn tricky_text(text in "([a-zA-Z0-9!$@|.*_ -]|\u{200b}|\u{feff}|\u{00ad}|\u{ff42}|\u{0130}|\t|\n){0,60}") {
        body::check(&text);
    }

    #[test]
    fn any_text(text in "\\PC{0,80}") {
        body::check(&text);
    }

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        body::run(&data);
    }
}

#[test]
fn saved_crashes_stay_fixed() {
    for (name, input) in regressions::inputs("normalize_rules") {
        println!("{name}");
        body::run(&input);
    }
}
