import java.util.Properties
import org.jetbrains.kotlin.gradle.dsl.JvmTarget

plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
    alias(libs.plugins.kotlin.compose)
}

// The repository root: the app builds its native library from the top-level CMakeLists.txt and
// compiles the JNI class ai.qwenvledge.QwenVLNative from native/java (one copy, shared with CMake).
val repoRoot: File = rootProject.projectDir.parentFile

// The llama.cpp source folder of the pinned version (README.md, "llama.cpp source"): the Gradle
// property qwenvl.llamaCppDir (gradle.properties, local.properties or -P), else $LLAMA_CPP_DIR.
val llamaCppDir: String = run {
    val local = Properties().apply {
        val f = rootProject.file("local.properties")
        if (f.isFile) f.inputStream().use { load(it) }
    }
    val dir = (findProperty("qwenvl.llamaCppDir") as String?)
        ?: local.getProperty("qwenvl.llamaCppDir")
        ?: System.getenv("LLAMA_CPP_DIR")
        ?: throw GradleException(
            "Set qwenvl.llamaCppDir in android_demo/local.properties (or -Pqwenvl.llamaCppDir=..., or " +
                "LLAMA_CPP_DIR) to the pinned llama.cpp source folder: see android_demo/README.md"
        )
    val folder = file(dir)
    if (!folder.resolve("include/llama.h").isFile) {
        throw GradleException("qwenvl.llamaCppDir=$dir is not a llama.cpp source folder (no include/llama.h)")
    }
    folder.absolutePath
}

val armArch: String = (findProperty("qwenvl.armArch") as String?) ?: "armv8.2-a+dotprod+fp16"

// ONNX Runtime for the native vision step. The app has no ONNX Runtime Java code: libqwenvl_core.so runs
// vision.onnx through ONNX Runtime's C API (native/src/vision_encoder.cpp, the code `qwenvl-native` and the
// ARM64 tests run) and links the C library libonnxruntime.so. That file is taken out of the onnxruntime-android
// AAR (jni/arm64-v8a/libonnxruntime.so; the release pinned in gradle/libs.versions.toml, the desktop runtime's),
// handed to CMake as QWENVL_ORT_LIBRARY (native/cmake/QwenvlOrt.cmake imports it as qwenvl::onnxruntime) and
// packaged beside libqwenvl_core.so (jniLibs below). By hand, the same with the NDK:
//   unzip -j onnxruntime-android-1.32.0.aar jni/arm64-v8a/libonnxruntime.so -d ort/
//   cmake ... -DQWENVL_ORT_LIBRARY=$PWD/ort/libonnxruntime.so   (android_demo/README.md, "Native build")
val onnxruntimeAar: Configuration by configurations.creating {
    isCanBeConsumed = false
    isTransitive = false  // the .so only: none of the AAR's Java dependencies
}
dependencies {
    onnxruntimeAar(variantOf(libs.onnxruntime.android) { artifactType("aar") })
}
val onnxruntimeJniLibs: File = layout.buildDirectory.dir("onnxruntime/jniLibs").get().asFile
// Extracted while Gradle configures the project: CMake (configured at sync and at build) needs the file then.
val onnxruntimeLibrary: File = onnxruntimeJniLibs.resolve("arm64-v8a/libonnxruntime.so").also { lib ->
    if (!lib.isFile) {
        copy {
            from(zipTree(onnxruntimeAar.singleFile)) {
                include("jni/arm64-v8a/libonnxruntime.so")
                eachFile { path = path.removePrefix("jni/") }
                includeEmptyDirs = false
            }
            into(onnxruntimeJniLibs)
        }
    }
    if (!lib.isFile) throw GradleException("${onnxruntimeAar.singleFile} has no jni/arm64-v8a/libonnxruntime.so")
}

android {
    namespace = "ai.qwenvledge.demo"
    compileSdk = libs.versions.compileSdk.get().toInt()
    ndkVersion = libs.versions.ndk.get()

    defaultConfig {
        applicationId = "ai.qwenvledge.demo"
        minSdk = libs.versions.minSdk.get().toInt()
        targetSdk = libs.versions.targetSdk.get().toInt()
        versionCode = 1
        versionName = "0.1.0"

        ndk {
            // llama.cpp is only worth running on 64-bit ARM phones.
            abiFilters += "arm64-v8a"
        }
        externalNativeBuild {
            cmake {
                arguments += listOf(
                    "-DLLAMA_CPP_DIR=$llamaCppDir",
                    "-DANDROID_STL=c++_shared",
                    // A debug llama.cpp is 10-50x slower: optimise the native code in every variant.
                    "-DCMAKE_BUILD_TYPE=Release",
                    // Cross-compiling: no -march=native (llama.cpp docs/android.md). The CPU kernels
                    // target ARMv8.2 + dot product + fp16 (phones since about 2019); override with
                    // -Pqwenvl.armArch=armv8-a for older ones, armv8.6-a+dotprod+i8mm+fp16 for newer.
                    "-DGGML_NATIVE=OFF",
                    "-DGGML_CPU_ARM_ARCH=$armArch",
                    "-DGGML_OPENMP=OFF",
                    "-DGGML_LLAMAFILE=OFF",
                    "-DLLAMA_OPENSSL=OFF",
                    // llama.cpp linked statically into libqwenvl_core.so: no libllama/libggml to ship.
                    "-DBUILD_SHARED_LIBS=OFF",
                    "-DQWENVL_BUILD_JNI=ON",
                    "-DQWENVL_BUILD_TESTS=OFF",
                    // The vision step in the core: the AAR's libonnxruntime.so (see onnxruntimeAar above).
                    "-DQWENVL_ORT_LIBRARY=${onnxruntimeLibrary.absolutePath}",
                )
                // libqwenvl_jni.so (System.loadLibrary("qwenvl_jni") in QwenVLNative) and the
                // libqwenvl_core.so it links; both are packaged, the loader finds the second itself.
                targets += listOf("qwenvl_jni", "qwenvl_core")
            }
        }
    }

    externalNativeBuild {
        cmake {
            path = repoRoot.resolve("CMakeLists.txt")
            version = libs.versions.cmake.get()
        }
    }

    sourceSets {
        getByName("main") {
            // ai.qwenvledge.QwenVLNative (and the host-only NativeSmokeTest, which R8 drops).
            java.srcDir(repoRoot.resolve("native/java"))
            // lib/arm64-v8a/libonnxruntime.so, which libqwenvl_core.so needs at load time.
            jniLibs.srcDir(onnxruntimeJniLibs)
        }
    }

    buildTypes {
        release {
            isMinifyEnabled = true
            proguardFiles(getDefaultProguardFile("proguard-android-optimize.txt"), "proguard-rules.pro")
            // A demo: sign release builds with the debug key so `installRelease` works out of the box.
            signingConfig = signingConfigs.getByName("debug")
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    buildFeatures {
        compose = true
    }
    packaging {
        jniLibs {
            // Models are memory-mapped from files; native libraries load straight from the APK.
            useLegacyPackaging = false
            // AGP may also package the imported library CMake links: one copy.
            pickFirsts += "lib/*/libonnxruntime.so"
        }
    }
}

kotlin {
    compilerOptions {
        jvmTarget.set(JvmTarget.JVM_17)
    }
}

dependencies {
    implementation(libs.androidx.core.ktx)
    implementation(libs.androidx.activity.compose)
    implementation(libs.androidx.lifecycle.viewmodel.compose)
    implementation(libs.androidx.lifecycle.runtime.compose)
    implementation(platform(libs.androidx.compose.bom))
    implementation(libs.androidx.compose.ui)
    implementation(libs.androidx.compose.ui.graphics)
    implementation(libs.androidx.compose.material3)
    implementation(libs.kotlinx.coroutines.android)
    debugImplementation(libs.androidx.compose.ui.tooling)

    testImplementation(libs.junit)
    testImplementation(libs.org.json)
}
