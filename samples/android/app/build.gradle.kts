plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "ai.lrtdeploy.sample"
    compileSdk = 34

    defaultConfig {
        applicationId = "ai.lrtdeploy.sample"
        minSdk = 24
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
    }
    buildTypes {
        release {
            isMinifyEnabled = false
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
    // The bundle is read from assets/bundle (see README: copy it there before building).
}

dependencies {
    // ONNX Runtime Mobile's full Android build: CPU, XNNPACK and NNAPI execution providers,
    // reads both model.ort and model.onnx.
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.27.0")
    // Hugging Face tokenizers (Rust) through DJL, with the Android native library: reads the
    // bundle's tokenizer.json as the Python runtime does.
    implementation("ai.djl.huggingface:tokenizers:0.33.0")
    implementation("ai.djl.android:tokenizer-native:0.33.0")
}
